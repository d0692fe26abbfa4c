"""`async-rlhf status`: the running job's /status and /queue, printed for a terminal; for a run that has ended,
what it left (summary.json, or where it stopped and how to continue)."""
from __future__ import annotations

import json
import math
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from async_rlhf.checkpoint.store import CheckpointStore
from async_rlhf.config.base import ConfigError
from async_rlhf.config.runtime import API_TOKEN_ENV
from async_rlhf.outputs.run_lock import RunDirLock


def find_run(run_dir: Path | None) -> Path:
    """The run whose API to ask: `run_dir`, else the most recently started run under runs/ that serves one."""
    if run_dir is not None and not run_dir.is_dir():
        raise ConfigError(f"status error: no directory {run_dir}; pass --run-dir a run's directory (runs/<time>/)")
    if run_dir is not None and not (run_dir / "api_url").is_file() and RunDirLock.held(run_dir):
        raise ConfigError(_no_api(run_dir))
    candidates = ([run_dir / "api_url"] if run_dir
                  else sorted(Path("runs").glob("*/api_url"), key=lambda p: p.stat().st_mtime))
    if run_dir is not None and not candidates[-1].is_file():
        raise ConfigError(f"status error: no run has served its API from {run_dir} (no api_url there); if one is "
                          "starting there, try again in a moment, else pass a run's directory")
    if not candidates:
        raise ConfigError("status error: no api_url in runs/*; pass --url http://HOST:PORT or --run-dir DIR")
    return candidates[-1].parent


def _no_api(run_dir: Path) -> str:
    """Why a running run has no API to ask: turned off (its steps are still in metrics.jsonl), or not up yet."""
    try:
        api = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("api") or {}
    except (OSError, ValueError, yaml.YAMLError, AttributeError):
        api = {}
    if api.get("enabled") is not False:
        return f"status error: the run in {run_dir} is starting and its HTTP API is not up yet; try again in a moment"
    return (f"status error: the run in {run_dir} runs with its HTTP API off (api.enabled=false), which status asks; "
            f"its steps so far are in {run_dir / 'metrics.jsonl'}{_last_step(run_dir)}")


def _last_step(run_dir: Path) -> str:
    """' (the last: step N)' from the end of metrics.jsonl (a line still being written skipped), or '' where none is
    written yet."""
    try:
        with (run_dir / "metrics.jsonl").open("rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - 8192))
            tail = fh.read().splitlines()
    except OSError:
        return ""
    for line in reversed(tail):
        try:
            return f" (the last: step {int(json.loads(line)['step'])})"
        except (ValueError, KeyError, TypeError):
            continue
    return ""


def print_ended(run_dir: Path, as_json: bool = False) -> int | None:
    """A run directory no process runs in, whose run got as far as its API or a step: what it left, and the exit status
    (0 for a run that ended with its summary, 1 for one that failed or was killed). None otherwise (a run still
    going or starting: its API answers)."""
    summary_path = run_dir / "summary.json"
    started = any((run_dir / name).is_file() for name in ("summary.json", "metrics.jsonl", "api_url"))
    if not started or RunDirLock.held(run_dir):
        return None
    if not summary_path.is_file():
        print(f"status error: the run in {run_dir} is not running and wrote no summary.json: it failed or was killed"
              f"{_continue(run_dir)}", file=sys.stderr)
        return 1
    try:
        summary = json.loads(summary_path.read_text())
        ended, steps, gold = summary_figures(summary)
    except (ValueError, KeyError, TypeError) as exc:  # damaged, cut short, or another tool's file
        print(f"status error: {summary_path} cannot be read as a run's summary ({type(exc).__name__}: {exc}); its "
              f"steps are in {run_dir / 'metrics.jsonl'}", file=sys.stderr)
        return 1
    print(json.dumps({"ended": True, "summary": summary}, indent=2) if as_json else
          f"run {run_dir.name} has ended ({ended}): {steps}; {gold}; outputs in {run_dir}")
    return 0


def summary_figures(summary: dict) -> tuple[str, str, str]:
    """How a run ended, its steps and its gold reward, from its summary: for the run's last line and for status."""
    return ("stopped early" if summary["stopped_early"] else "done",
            f"{summary['steps']} steps in {summary['wall_s']:.1f}s of training",
            f"gold reward {_fmt(summary['initial_gold_reward'])} -> {_fmt(summary['final_gold_reward'])}, max "
            f"staleness seen {summary['max_staleness_seen']}")


def _continue(run_dir: Path) -> str:
    log = run_dir / "error.log"
    why = f" (its traceback: {log})" if log.is_file() else ""
    ckpts = CheckpointStore(run_dir / "checkpoints", keep_last=1).checkpoints()  # only read: keep_last unused
    if not ckpts:
        return f"{why}; it has no checkpoint, so start it again"
    return f"{why}; `async-rlhf train --resume {run_dir}` continues it from {ckpts[-1].path.name}"


def find_url(run: Path) -> str:
    return (run / "api_url").read_text().strip()


def find_token(run: Path | None) -> str | None:
    """The token reads need when the API is served beyond loopback: $ASYNC_RLHF_API_TOKEN, else the run's own
    api_token file (written when neither api.token nor the variable was set)."""
    token = os.environ.get(API_TOKEN_ENV)
    if token or run is None:
        return token
    try:
        return (run / "api_token").read_text().strip() or None
    except OSError:  # no file (the token came from the config or the variable) or not ours to read
        return None


def _get(url: str, token: str | None) -> dict:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as resp:
        return json.loads(resp.read())


def _fmt(value: object, digits: int = 3) -> str:
    """None (null in the run's JSON) and NaN as "-"."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def render(status: dict, queue: dict) -> str:
    last, learner = status["last"], status["learner"]
    lines = [
        f"run {status['run_id']}  phase {status['phase']}  step {status['step']}/{status['total_steps']}  "
        f"elapsed {status['elapsed_s']:.0f}s  eta {_fmt(status['eta_s'], 0)}s",
        f"reward {_fmt(last['reward_mean'])}  kl {_fmt(last['kl'])}  staleness {_fmt(last['staleness_mean'], 2)} "
        f"(bound {status['max_staleness']})",
        f"queue {queue['depth']}/{queue['capacity']}  produced {queue['produced']}  consumed {queue['consumed']}  "
        f"dropped_stale {queue['dropped_stale']}  failed_reward {queue['failed_reward']}  "
        f"oldest {queue['oldest_age_s']:.1f}s  staleness histogram {queue['staleness_histogram']}",
        f"learner v{learner['version']}  busy {learner['busy_fraction']:.0%}  step {_fmt(learner['mean_step_s'])}s",
    ]
    for g in status["generators"]:
        lines.append(f"generator {g['generator_id']}  v{g['version']}  busy {g['busy_fraction']:.0%}  "
                     f"{g['tokens_per_s']:.0f} tok/s  restarts {g['restarts']}")
    return "\n".join(lines)


def print_status(url: str, token: str | None = None, as_json: bool = False) -> int:
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"status error: '{url}' is not an API URL; pass --url http://HOST:PORT")
    url = url.rstrip("/")
    try:
        status, queue = _get(f"{url}/status", token), _get(f"{url}/queue", token)
        text = json.dumps({"status": status, "queue": queue}, indent=2) if as_json else render(status, queue)
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            print(f"status error: {url} refused the {'given' if token else 'missing'} API token (reads need it when "
                  f"api.host is not loopback); set ${API_TOKEN_ENV} or pass --run-dir DIR (its api_token)",
                  file=sys.stderr)
        else:
            print(f"status error: {url} answered HTTP {exc.code}; is it this project's API?", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"status error: cannot reach {url} ({exc}); is the run still going?", file=sys.stderr)
        return 1
    except (ValueError, KeyError, TypeError) as exc:  # not JSON, or not this project's schema
        print(f"status error: {url} did not answer with a run's status ({type(exc).__name__}: {exc}); is it this "
              "project's API?", file=sys.stderr)
        return 1
    print(text)
    return 0
