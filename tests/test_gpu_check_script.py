"""scripts/gpu_check.sh on this CPU machine: the transport it picks from the GPU count and the JSON it
writes. GPU_CHECK_GPUS stands in for the count torch would report (the script's own override); the GPU
tests it then runs skip here (no CUDA), so only the script's logic is checked, not the transports."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT


def _run(tmp_path: Path, gpus: str | None) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "runs" / "gpu_check.json"
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT), "GPU_CHECK_OUT": str(out)}
    env.pop("GPU_CHECK_TRANSPORT", None)
    if gpus is not None:
        env["GPU_CHECK_GPUS"] = gpus
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=env)
    return proc, out


@pytest.mark.parametrize(("gpus", "transport"), [("1", "ipc"), ("2", "nccl")])
def test_transport_follows_the_gpu_count_and_the_numbers_land_in_json(tmp_path: Path, gpus: str,
                                                                      transport: str) -> None:
    proc, out = _run(tmp_path, gpus)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{gpus} GPU(s): weight_sync.transport={transport}" in proc.stdout
    data = json.loads(out.read_text())
    assert (data["transport"], data["gpus"], data["pytest_exit"]) == (transport, int(gpus), 0)
    assert 0 <= data["check_wall_s"] < 480


def test_without_a_gpu_it_says_so_in_one_line_and_exits_2(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    proc, out = _run(tmp_path, None)
    assert proc.returncode == 2 and not out.exists()
    assert proc.stderr.strip().splitlines() == [
        "gpu_check: no CUDA GPU visible to torch; run it on a GPU machine with the gpu extra installed"]
