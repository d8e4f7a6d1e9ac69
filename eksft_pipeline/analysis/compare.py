"""Did a stage move the numbers? Paired differences of pass@1 between two evaluated models, with a CI.

Two models evaluated on the same problems (the eval stage writes each benchmark's `per_problem_acc`:
problem id -> mean accuracy over its n samples) are compared problem by problem:

    diff_b          = mean_p [acc_after(p) - acc_before(p)]            over the shared problems of benchmark b
    diff (Avg)      = mean_b diff_b                                      (benchmarks weighted equally, as the
                                                                          paper's Avg column)
    95% CI          = percentiles 2.5 / 97.5 of the same statistic over `n_boot` paired bootstrap resamples:
                      each resample draws, independently per benchmark, as many problems as it has, with
                      replacement, and uses the SAME problems for both models (the pairing removes the
                      between-problem variance that two separate CIs would double count).

A movement is "significant" here when the CI excludes zero. `movements` lists base -> SFT and SFT -> SFT→RL for
every method (init) whose eval holds both targets; the base model may come from another method's eval.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from eksft_pipeline.analysis.gather import EvalResult


def paired_diff(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]], *, n_boot: int = 2000,
                seed: int = 0) -> dict[str, Any]:
    """`before` / `after`: benchmark -> {problem id -> accuracy}. Only shared benchmarks and problems count.

    Returns {"diff", "ci95": [lo, hi], "per_benchmark": {b: {"diff", "ci95", "n_problems"}}, "n_boot"}.
    Raises ValueError when the two share no problem (different benchmarks or problem ids).
    """
    benches = sorted(set(before) & set(after))
    pairs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for b in benches:
        pids = sorted(set(before[b]) & set(after[b]))
        if pids:
            pairs[b] = (np.array([before[b][p] for p in pids]), np.array([after[b][p] for p in pids]))
    if not pairs:
        raise ValueError("paired comparison: the two evaluations share no benchmark problem")
    rng = np.random.default_rng(seed)
    boots = []
    per = {}
    for b, (x, y) in pairs.items():
        d = y - x  # [P]
        idx = rng.integers(0, len(d), size=(n_boot, len(d)))
        boot = d[idx].mean(axis=1)  # [n_boot]
        boots.append(boot)
        per[b] = {"diff": float(d.mean()), "ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
                  "n_problems": len(d)}
    avg_boot = np.mean(boots, axis=0)
    diff = float(np.mean([v["diff"] for v in per.values()]))
    return {"diff": diff, "ci95": [float(np.percentile(avg_boot, 2.5)), float(np.percentile(avg_boot, 97.5))],
            "per_benchmark": per, "n_boot": n_boot}


def _acc(e: EvalResult) -> dict[str, dict[str, float]] | None:
    out = {b: m.get("per_problem_acc") for b, m in e.benchmarks.items()}
    return None if any(v is None for v in out.values()) else out


def movements(evals: Sequence[EvalResult], *, n_boot: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    """base -> SFT and SFT -> SFT→RL paired differences for every init with both ends evaluated."""
    base = next((e for e in evals if e.target == "base" and _acc(e) is not None), None)
    rows = []
    for init in sorted({e.init for e in evals}):
        by_t = {e.target: e for e in evals if e.init == init and _acc(e) is not None}
        b = by_t.get("base") or base
        for src, dst, what in ((b, by_t.get("sft"), "base → SFT"), (by_t.get("sft"), by_t.get("rl"), "SFT → SFT→RL")):
            if src is None or dst is None:
                continue
            try:
                res = paired_diff(_acc(src), _acc(dst), n_boot=n_boot, seed=seed)
            except ValueError:
                continue
            rows.append({"init": init, "movement": what, "from": src.label, "to": dst.label,
                         "before": _mean_acc(src), "after": _mean_acc(dst), **res,
                         "significant": res["ci95"][0] > 0 or res["ci95"][1] < 0})
    return rows


def _mean_acc(e: EvalResult) -> float:
    vals = [m["avg@n"] for m in e.benchmarks.values()]
    return float(sum(vals) / len(vals))


def movement_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per movement, pass@1 before / after (mean over benchmarks), paired diff and CI."""
    if not rows:
        return ""
    lines = ["| method | movement | pass@1 before | pass@1 after | Δ (points) | 95% CI (paired bootstrap) | CI excludes 0 |",
             "|---|---|---:|---:|---:|---|---|"]
    for r in rows:
        lo, hi = r["ci95"]
        lines.append(f"| {r['init']} | {r['movement']} | {100 * r['before']:.1f} | {100 * r['after']:.1f} | "
                     f"{100 * r['diff']:+.1f} | [{100 * lo:+.1f}, {100 * hi:+.1f}] | {'yes' if r['significant'] else 'no'} |")
    return "\n".join(lines) + "\n"
