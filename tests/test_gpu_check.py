"""benchmarks/gpu_check.py on a CPU machine: the plan resolves, the run refuses in one line.

The check itself needs a CUDA GPU (docs/benchmarks.md records when it ran); what CPU CI can
hold it to is that every stage's GPU settings are valid (a typo would only show on the GPU box)
and that a machine without CUDA gets a clear refusal, not a traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_plan_resolves_every_stage_at_gpu_settings(tmp_path: Path) -> None:
    res = _run("--plan", "--work", str(tmp_path / "w"))
    assert res.returncode == 0, res.stderr[-2000:]
    for stage in ("extract", "label", "sft", "rl", "eval"):
        assert f"\n  {stage}: {{" in res.stdout
    sft_line = res.stdout.split("\n  sft: ", 1)[1].splitlines()[0]
    assert '"dtype": "bfloat16"' in sft_line and "precision" not in res.stdout
    assert not (tmp_path / "w").exists()  # a plan writes nothing


def test_without_cuda_it_refuses_in_one_line() -> None:
    assert not torch.cuda.is_available(), "this test checks the CPU-machine path"
    res = _run()
    assert res.returncode == 2
    err = res.stderr.strip()
    assert err.splitlines() == [err] and err.startswith("gpu_check: no CUDA GPU here")
