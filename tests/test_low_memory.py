"""Workers killed by Ray's memory monitor (the node short of memory) are recovered like any dead worker.

Ray kills the newest workers while the node's memory is above RAY_memory_usage_threshold (0.95 by default) and
raises OutOfMemoryError, not RayActorError, for their calls: before, the first such kill ended the run with
Ray's paragraph, where a SIGKILLed worker was restarted. Here the memory is real: a loss of the user's own takes
6 GiB once, for a second, and the threshold sits 5 GiB above what the machine used before the run started, as
Ray's monitor reads it (cgroup-aware; the run itself takes about 3 GiB), so Ray kills whichever of the run's
workers it picks, the learner included.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import psutil
import pytest

from tests.helpers import ROOT
from tests.helpers import train_command as quickstart_command

pytestmark = pytest.mark.slow

GIB = 2**30
HOG_LOSS = '''
import time
from pathlib import Path

from learners.losses import get_loss


def hog_loss(inputs, params):
    """RLOO, but the first call of the run takes 6 GiB (touched: resident) for a second."""
    mark = Path(__file__).with_name("hogged")
    if not mark.exists():
        mark.touch()
        block = bytearray(6 * 2**30)
        block[::4096] = b"x" * len(block[::4096])
        time.sleep(1.0)
        del block
    return get_loss("rloo").fn(inputs, params)
'''


def test_workers_killed_for_want_of_memory_are_replaced_and_the_run_finishes(tmp_path: Path) -> None:
    from ray._private.utils import get_system_memory, get_used_memory  # the monitor's own reading (cgroup-aware)

    used, total = get_used_memory(), get_system_memory()
    if total - used < 12 * GIB or psutil.virtual_memory().available < 12 * GIB:
        pytest.skip(f"needs 12 GiB free to arm Ray's memory monitor safely ({(total - used) / GIB:.1f} free)")
    threshold = (used + 5 * GIB) / total
    (tmp_path / "hog_loss.py").write_text(HOG_LOSS)
    run_dir = tmp_path / "run"
    cmd = quickstart_command(run_dir, "learner.steps=20", "eval.every=0", "task.eval_prompts=16", "api.enabled=false",
                             "loss.import_path=hog_loss:hog_loss")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "RAY_memory_usage_threshold": f"{threshold:.3f}", "RAY_memory_monitor_refresh_ms": "100"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "hogged").exists()
    summary = json.loads((run_dir / "summary.json").read_text())
    restarts = summary["learner_restarts"] + summary["generator_restarts"] + summary["reward_restarts"]
    assert summary["steps"] == 20 and restarts >= 1, summary
    assert "Traceback" not in proc.stderr and "OutOfMemoryError" not in proc.stderr
    if summary["learner_restarts"]:
        assert "Ray killed workers of the run: the node ran low on memory" in proc.stderr
