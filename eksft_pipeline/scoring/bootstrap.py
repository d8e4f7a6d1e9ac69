"""Percentile bootstrap CI over per-problem values (shared by eval and the reports; no stage imports)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


def _as_int(x: Any, name: str) -> int:
    if isinstance(x, bool) or not isinstance(x, int | np.integer):
        raise TypeError(f"{name} must be an int, got {type(x).__name__} {x!r}")
    return int(x)


def bootstrap_ci(
    per_problem_values: Any,
    stat: Callable[[np.ndarray], float] = np.mean,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Percentile bootstrap CI over problems: ``(stat(values), low, high)``.

    ``per_problem_values`` has problems on its first axis (shape [P] or [P, ...], e.g. per-problem pass@k,
    or a [P, n] correctness matrix with a ``stat`` that computes a metric from it). Each of ``n_boot``
    replicates resamples P problems with replacement (``numpy.random.default_rng(seed)``) and applies
    ``stat``; low/high are the ``alpha/2`` and ``1 - alpha/2`` quantiles of the replicates. Same inputs and
    seed give the same interval.
    """
    vals = np.asarray(per_problem_values, dtype=np.float64)
    if vals.ndim == 0 or vals.shape[0] == 0:
        raise ValueError(f"bootstrap_ci: need at least one problem, got shape {vals.shape}")
    if not np.isfinite(vals).all():
        raise ValueError("bootstrap_ci: values contain NaN or inf")
    n_boot = _as_int(n_boot, "n_boot")
    if n_boot < 1:
        raise ValueError(f"bootstrap_ci: n_boot={n_boot} must be >= 1")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"bootstrap_ci: alpha={alpha} must be in (0, 1)")
    rng = np.random.default_rng(seed)
    p = vals.shape[0]
    idx = rng.integers(0, p, size=(n_boot, p))
    if stat is np.mean and vals.ndim == 1:
        boots = vals[idx].mean(axis=1)  # vectorised fast path, same numbers as the loop
    else:
        boots = np.array([float(stat(vals[row])) for row in idx])
    low, high = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return float(stat(vals)), float(low), float(high)
