"""Sub-commands for models and rewards: `prepare`, `serve-reward`, `train-rm`, `sample-pairs`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from async_rlhf.cli.arguments import fraction, non_negative_float, port, positive_float, positive_int, writable_place
from async_rlhf.config.base import ConfigError
from async_rlhf.config.run import load_config

if TYPE_CHECKING:
    from reward_models.columns import ServedColumns


def add_parsers(sub: argparse._SubParsersAction) -> None:
    prep = sub.add_parser("prepare", help="turn a model that ships offline (smollm2) into an HF checkpoint, once")
    prep.add_argument("name", help="registered model name, e.g. smollm2")
    prep.add_argument("--force", action="store_true", help="redo it even if the cache has it")
    serve = sub.add_parser("serve-reward", help="serve a reward model over HTTP (docs/reward_protocol.md)")
    serve.add_argument("model", help="a rule scorer name (e.g. vader_compound), 'pkg.module:function' of "
                       "your own, or a reward model directory")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=port, default=8500)
    serve.add_argument("--batch-size", type=positive_int, default=16, help="learned model: pairs per forward pass")
    serve.add_argument("--max-length", type=positive_int, default=512, help="learned model: tokens per pair")
    rm = sub.add_parser("train-rm", help="train a scalar-head reward model from preference pairs (TRL RewardTrainer)")
    rm.add_argument("pairs", help="prompt/chosen/rejected pairs: .jsonl, .parquet or a save_to_disk directory")
    rm.add_argument("--base", required=True, help="checkpoint to start from: a directory or a prepared name (smollm2)")
    rm.add_argument("--out", type=Path, required=True, help="new directory for the reward model")
    rm.add_argument("--epochs", type=positive_float, default=1.0)
    rm.add_argument("--lr", type=positive_float, default=2e-5)
    rm.add_argument("--batch-size", type=positive_int, default=8)
    rm.add_argument("--max-length", type=positive_int, default=256, help="longer pairs are dropped (TRL)")
    rm.add_argument("--eval-fraction", type=fraction, default=0.1, help="pairs held out for the accuracy printed")
    rm.add_argument("--seed", type=int, default=0)
    pairs = sub.add_parser("sample-pairs",
                           help="sample responses from a config's policy, label pairs by its gold reward")
    pairs.add_argument("config", help="run config (its task, model.path and reward.gold are used)")
    pairs.add_argument("overrides", nargs="*", default=[])
    pairs.add_argument("--out", type=Path, required=True, help="JSONL file to write")
    pairs.add_argument("--prompts", type=positive_int, default=256, help="train prompts to sample")
    pairs.add_argument("--samples", type=int, default=2, help="responses per prompt; the best and worst make the pair")
    pairs.add_argument("--min-margin", type=non_negative_float, default=0.0,
                       help="skip prompts whose gold scores differ by <= this")


def _base_dir(value: str) -> Path:
    from async_rlhf.config.pretrained_names import resolve_model_path

    try:
        path = resolve_model_path(value)
    except ValueError as exc:
        raise ConfigError(f"config error: --base: {exc}") from None
    if not (path / "config.json").is_file():
        raise ConfigError(f"config error: --base: no config.json in '{path}'; give an HF checkpoint directory "
                          f"or a prepared name (async-rlhf prepare smollm2)")
    return path


def cmd_prepare(args: argparse.Namespace) -> int:
    from async_rlhf.policies.pretrained import MODELS, prepare

    if args.name not in MODELS:
        raise ConfigError(f"config error: unknown model '{args.name}'; valid names: {', '.join(sorted(MODELS))}")
    try:
        print(prepare(args.name, args.force, log=lambda m: print(f"[async-rlhf] {m}", flush=True)))
    except FileNotFoundError as exc:
        raise ConfigError(f"config error: {exc}") from None
    return 0


def reward_scorer(model: str, batch_size: int = 16, max_length: int = 512) -> tuple[Any, ServedColumns]:
    """A rule scorer by name or a user's "pkg.module:function", else a learned reward model directory; with the
    dataset columns it takes (a learned model: none)."""
    from async_rlhf.user_code import UserCodeError, is_import_path
    from reward_models.columns import NO_SERVED
    from reward_models.rules import SCORERS
    from reward_models.server import rule_scorer

    if model in SCORERS or is_import_path(model):
        try:
            return rule_scorer(model)
        except UserCodeError as exc:
            raise ConfigError(f"config error: {exc}") from None
    if not Path(model).is_dir():
        raise ConfigError(f"config error: serve-reward: '{model}' is neither a rule scorer "
                          f"({', '.join(sorted(SCORERS))}), a 'pkg.module:function' of your own, "
                          "nor a reward model directory")
    from reward_models.learned import LearnedRewardModel

    try:
        return LearnedRewardModel(model, batch_size, max_length), NO_SERVED
    except ValueError as exc:
        raise ConfigError(f"config error: serve-reward: {exc}") from None


def cmd_serve_reward(args: argparse.Namespace) -> int:
    import uvicorn

    from async_rlhf.api.serving import bound_socket
    from reward_models.server import create_reward_app

    scorer, columns = reward_scorer(args.model, args.batch_size, args.max_length)
    app = create_reward_app(Path(args.model).name or args.model, scorer, columns)
    try:  # bound here, so a taken port or unknown host is one line, not uvicorn's log line and exit 3
        sock = bound_socket(args.host, args.port)
    except OSError as exc:
        raise ConfigError(f"config error: serve-reward: cannot serve on {args.host}:{args.port} ({exc.strerror}); "
                          "pass --host and --port of an address this machine can serve") from None
    host, bound_port = sock.getsockname()[:2]
    print(f"[async-rlhf] serving reward model '{args.model}' on http://{host}:{bound_port} (POST /score)", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    return 0


def cmd_train_rm(args: argparse.Namespace) -> int:
    from reward_models.training import RewardTrainingArgs, load_pairs, train_reward_model

    load_pairs(args.pairs)  # bad input fails here, before the model loads
    if (args.out / "config.json").exists():
        raise ConfigError(f"config error: train-rm: '{args.out}' already holds a model; choose another --out")
    if args.out.exists() and not args.out.is_dir():
        raise ConfigError(f"config error: train-rm: --out '{args.out}' is a file; pass a new directory")
    writable_place(args.out, "--out", "train-rm", directory=True)
    targs = RewardTrainingArgs(args.pairs, _base_dir(args.base), args.out, args.epochs, args.lr, args.batch_size,
                               args.max_length, args.eval_fraction, args.seed)
    metrics = train_reward_model(targs, log=lambda m: print(f"[async-rlhf] {m}", flush=True))
    (args.out / "rm_metrics.json").write_text(json.dumps(metrics, indent=1))
    return 0


def cmd_sample_pairs(args: argparse.Namespace) -> int:
    from async_rlhf.cli.pairs import sample_pairs

    cfg = load_config(args.config, args.overrides)
    writable_place(args.out, "--out", "sample-pairs")
    summary = sample_pairs(cfg, args.out, args.prompts, args.samples, args.min_margin,
                           log=lambda m: print(f"[async-rlhf] {m}", flush=True))
    print(json.dumps(summary))
    return 0


COMMANDS = {"prepare": cmd_prepare, "serve-reward": cmd_serve_reward, "train-rm": cmd_train_rm,
            "sample-pairs": cmd_sample_pairs}
