"""scripts/gpu_check.sh cannot rot: its CPU smoke run (--cpu --tiny) exercises every probe and the summary."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_cpu_smoke_run():
    res = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--cpu", "--tiny", "--skip-tests"],
                         cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO)})  # fmt: skip
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    summary = out[out.index("=== gpu_check summary") :]
    for check in ("env", "head_naive", "head_fused", "head_fused_vs_naive", "sft_step_naive", "sft_step_fused"):
        assert any(line.startswith("PASS") and f" {check} " in line for line in summary.splitlines()), (check, summary)
    assert "gpu_check: 6 passed, 0 failed, 1 skipped" in summary


def test_gpu_check_without_cuda_says_how_to_run_it():
    if __import__("torch").cuda.is_available():
        pytest.skip("a CUDA device is present")
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py")], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert res.returncode == 2 and "--cpu --tiny" in res.stderr
