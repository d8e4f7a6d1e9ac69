"""scripts/bench_sft_step.py's steady-state numbers: warm-up excluded, median / p90, tokens/s, MFU (hand-computed),
and `gpu_check.sh --verl` running the benchmark through verl's SFT trainer (CPU smoke run, toy sizes)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_sft_step", REPO / "scripts" / "bench_sft_step.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_steady_state_leaves_the_warm_up_out():
    bench = _bench()
    # 3 warm-up steps (autotuning: 12, 8, 3 s), then 10 timed steps with one 2.8 s outlier
    times = [12.0, 8.0, 3.0, 0.2, 0.3, 0.2, 0.25, 2.8, 0.2, 0.3, 0.2, 0.25, 0.3]
    tokens = [1000] * 13
    st = bench.steady_state(times, tokens, warmup=3, flops_per_token=6e9, peak_flops=1e15)
    assert st["n"] == 10
    assert st["median_s"] == pytest.approx(0.25)  # sorted: .2 .2 .2 .2 .25 .25 .3 .3 .3 2.8 -> (0.25 + 0.25) / 2
    assert st["p90_s"] == pytest.approx(0.3)  # nearest rank ceil(0.9 * 10) = 9: the 9th smallest
    assert st["tokens_per_s"] == pytest.approx(10_000 / 5.0)  # 10 steps x 1000 tokens over 5.0 s
    assert st["mfu"] == pytest.approx(2000 * 6e9 / 1e15)
    # the outlier is the p90 when it is more than a tenth of the steps
    assert bench.steady_state([1, 1, 5], [1, 1, 1], warmup=0)["p90_s"] == 5
    assert bench.steady_state(times, tokens, warmup=3)["mfu"] is None  # no FLOP count, no MFU
    with pytest.raises(ValueError, match="no step after the 13 warm-up steps"):
        bench.steady_state(times, tokens, warmup=13)
    with pytest.raises(ValueError, match="13 step times but 12 token counts"):
        bench.steady_state(times, tokens[:-1], warmup=3)


def test_model_flops_per_token_by_hand():
    bench = _bench()
    # 1 layer, d=8, 2 heads of 4 (1 kv head), MLP 16, V=10, sequence of 5 tokens
    # q,k,v: 8*4*(2+2*1) = 128; o: 2*4*8 = 64; MLP 3*8*16 = 384; lm_head 10*8 = 80 -> 656 matmul parameters
    # attention: 6 * 1 layer * (2*4) * 5 = 240
    assert bench.model_flops_per_token(8, 1, 2, 1, 4, 16, 10, 5) == 6 * 656 + 240


@pytest.mark.slow
def test_gpu_check_verl_runs_the_benchmark_on_cpu():
    res = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--cpu", "--tiny", "--verl-only"],
                         cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO)})  # fmt: skip
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "1 warm-up + 2 timed steps per variant" in out
    for variant in ("verl-sft-fused", "eksft-fused"):
        line = next(x for x in out.splitlines() if x.strip().startswith(variant) and "step median" in x)
        assert "over steps 2-3" in line and "tokens/s" in line and "(init " in line, line
    summary = out[out.index("=== gpu_check summary") :]
    assert any(x.startswith("PASS  verl_sft_bench") and "step time" in x for x in summary.splitlines()), summary
    assert "gpu_check: 2 passed, 0 failed, 0 skipped" in summary
