"""Figures of the report (matplotlib, Agg backend, PNG):

* `plot_pass_at_k`: unbiased pass@k vs k (log2 axis), one line per evaluated model, one panel per
  benchmark plus their mean (the paper's Figure 2).
* `plot_drift`: fraction of parameters whose relative change exceeds each threshold, per SFT method
  (the paper's Figures 4-5 / Appendix C).
* `plot_sft_curves`: per-step IoU(M_H, M_KL), |M|/|T|, mean entropy and KL over M and over all
  tokens, and the loss, one line per method (the paper's Table 7 as curves).
* `plot_rl_curves`: DAPO score / response length / entropy / clip fraction per step.
* `plot_rl_val_curves`: benchmark pass@1 against the DAPO step (verl's validation, `rl.val_every`) per method,
  next to the training reward.
* `plot_rl_mismatch`: the rollout-vs-trainer log-prob mismatch per DAPO step (and the rollout correction's weights).

Each function returns the written path, or None when there is nothing to plot.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from eksft_pipeline.analysis.gather import EvalResult  # noqa: E402
from eksft_pipeline.analysis.tables import benchmark_order  # noqa: E402


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_pass_at_k(evals: Sequence[EvalResult], path: Path) -> Path | None:
    if not evals:
        return None
    benches = benchmark_order(evals)
    panels = [*benches, "mean"] if len(benches) > 1 else benches
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    for ax, name in zip(axes.flat, panels):
        for e in evals:
            if name == "mean":
                have = [e.benchmarks[b]["pass@k"] for b in benches if b in e.benchmarks]
                if len(have) != len(benches):
                    continue
                ks = sorted(set.intersection(*(set(int(k) for k in h) for h in have)))
                ys = [sum(h[str(k)] for h in have) / len(have) for k in ks]
            elif name in e.benchmarks:
                curve = e.benchmarks[name]["pass@k"]
                ks = sorted(int(k) for k in curve)
                ys = [curve[str(k)] for k in ks]
            else:
                continue
            ax.plot(ks, [100 * y for y in ys], marker="o", markersize=2.5, label=e.label)
        ax.set_xscale("log", base=2)
        ax.set_title(name)
        ax.set_xlabel("k")
        ax.set_ylabel("pass@k (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    return _save(fig, path)


def plot_drift(drift: dict[str, dict], path: Path) -> Path | None:
    if not drift:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for method, d in sorted(drift.items()):
        fo = d["overall"]["frac_over"]
        taus = sorted(fo, key=float)
        ax.plot([float(t) for t in taus], [100 * fo[t] for t in taus], marker="o", label=method)
    ax.set_xscale("log")
    ax.set_xlabel("relative-change threshold τ")
    ax.set_ylabel("% parameters with |Δθ|/|θ₀| > τ")
    ax.set_title("parameter drift vs the reference model")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


SFT_PANELS = (
    ("eksft/iou_seq_mean", "IoU(M_H, M_KL) per sequence"),
    ("eksft/iou_batch", "IoU(M_H, M_KL) over the batch"),
    ("eksft/iou", "IoU(M_H, M_KL)"),
    ("eksft/mask_frac", "|M| / |T|"),
    ("eksft/entropy_mask", "mean H over M"),
    ("eksft/kl_mask", "mean KL over M"),
    ("eksft/entropy_all", "mean H over T"),
    ("eksft/kl_all", "mean KL over T"),
    ("train/loss", "loss"),
)


def plot_sft_curves(sft_metrics: dict[str, dict[int, dict]], path: Path) -> Path | None:
    panels = [(k, t) for k, t in SFT_PANELS if any(k in m for steps in sft_metrics.values() for m in steps.values())]
    if not panels:
        return None
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels):
        for method, steps in sorted(sft_metrics.items()):
            xs = [s for s, m in steps.items() if key in m]
            if xs:
                ax.plot(xs, [steps[s][key] for s in xs], label=method, linewidth=1)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    return _save(fig, path)


def plot_rl_curves(rl_metrics: dict[str, dict[int, dict]], path: Path) -> Path | None:
    keys = (("critic/score/mean", "mean score"), ("response_length/mean", "response length"),
            ("actor/entropy", "policy entropy"), ("actor/pg_clipfrac", "clip fraction"))
    panels = [(k, t) for k, t in keys if any(k in m for st in rl_metrics.values() for m in st.values())]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 2.9), squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels):
        for init, steps in sorted(rl_metrics.items()):
            xs = [s for s, m in steps.items() if key in m]
            if xs:
                ax.plot(xs, [steps[s][key] for s in xs], marker="o", markersize=3, label=f"init={init}")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("DAPO step", fontsize=8)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    return _save(fig, path)


def plot_rl_val_curves(rl_metrics: dict[str, dict[int, dict]], path: Path) -> Path | None:
    """Benchmark pass@1 against the DAPO step (verl's validation, `rl.val_every`), one panel per benchmark (+ their
    mean), one line per method (init), next to the training reward (mean score of each step's batch)."""
    from eksft_pipeline.contract.rl_curves import val_curves

    curves = {init: val_curves(steps) for init, steps in rl_metrics.items()}
    curves = {i: c for i, c in curves.items() if c}
    if not curves:
        return None
    benches = sorted({b for c in curves.values() for b in c})
    panels = ["reward", *benches, *(["mean"] if len(benches) > 1 else [])]
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False)
    for ax, name in zip(axes.flat, panels):
        for init in sorted(curves):
            if name == "reward":
                steps = rl_metrics[init]
                xs = [s for s, m in steps.items() if "critic/score/mean" in m]
                ys = [steps[s]["critic/score/mean"] for s in xs]
            elif name == "mean":
                c = curves[init]
                xs = sorted(set.intersection(*(set(c.get(b, {})) for b in benches)))
                ys = [100 * sum(c[b][s] for b in benches) / len(benches) for s in xs]
            else:
                c = curves[init].get(name, {})
                xs, ys = sorted(c), [100 * c[s] for s in sorted(c)]
            if xs:
                ax.plot(xs, ys, marker="o", markersize=3, label=f"init={init}")
        ax.set_title("training reward (mean score)" if name == "reward" else f"{name}: pass@1 (%)", fontsize=9)
        ax.set_xlabel("DAPO step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    return _save(fig, path)


def plot_rl_mismatch(rl_metrics: dict[str, dict[int, dict]], path: Path) -> Path | None:
    """The rollout-vs-trainer log-prob mismatch per DAPO step (verl's rollout_corr/* and rollout_probs_diff metrics),
    and, when a rollout correction is on, its IS weights / rejected fraction; one line per method (init)."""
    from eksft_pipeline.contract.rl_curves import MISMATCH_PANELS

    have = {k for st in rl_metrics.values() for m in st.values() for k in m}
    panels = [(k, t) for k, t in MISMATCH_PANELS if k in have]
    if not panels:
        return None
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels):
        for init, steps in sorted(rl_metrics.items()):
            xs = [s for s, m in steps.items() if m.get(key) is not None and s > 0]
            if xs:
                ax.plot(xs, [steps[s][key] for s in xs], marker="o", markersize=3, label=f"init={init}")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("DAPO step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    return _save(fig, path)
