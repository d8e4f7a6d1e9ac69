"""scripts/bench_loss.py runs end to end at toy sizes and reports both ratios (numbers are meaningless here)."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bench_script_runs_at_toy_sizes():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_loss.py"), "--N", "64", "--V", "128",
                          "--d", "16", "--reps", "1", "--chunk-size", "16", "--no-gpu"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for variant in ("naive", "fused", "fused_sft"):
        assert f"  {variant:10s} time" in text and "(rounds: " in text
    assert "fused      / naive     : time" in text and "peak memory" in text
    assert "targets: memory <= 25% of naive:" in text
