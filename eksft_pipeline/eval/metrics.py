"""Sampling-based eval metrics: unbiased pass@k, avg@n, maj@k by answer-equivalence classes, bootstrap CIs.

All metrics take per-sample results of ``n`` completions per problem and estimate what a model would
score with ``k <= n`` samples, averaged over problems.

* ``pass@k`` (Chen et al. 2021, the Codex paper): for one problem with ``c`` correct of ``n`` samples,
  ``pass@k = 1 - C(n-c, k) / C(n, k)``, the probability that a uniformly random k-subset of the n samples
  holds at least one correct one. Computed as ``1 - prod_{i=n-c+1}^{n} (1 - k/i)`` in log space
  (``exp(sum(log1p(-k/i)))``), which stays accurate for n in the thousands where the binomials overflow
  floats. ``pass_at_k_curve`` averages it over problems.
* ``avg@n``: mean per-sample accuracy, equal to pass@1.
* ``maj@k``: see :func:`maj_at_k` (expected majority-vote accuracy over uniformly random k-subsets, ties
  counted fractionally).
* ``bootstrap_ci``: percentile bootstrap over problems (resampling problems with replacement).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from eksft_pipeline.scoring.bootstrap import _as_int, bootstrap_ci  # noqa: F401  (bootstrap_ci re-exported)

__all__ = [
    "avg_at_n",
    "bootstrap_ci",
    "maj_at_k",
    "maj_at_k_curve",
    "pass_at_k",
    "pass_at_k_curve",
    "pass_at_k_per_problem",
]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem: ``1 - C(n-c, k) / C(n, k)``.

    Raises ValueError unless ``n >= 1``, ``0 <= c <= n`` and ``1 <= k <= n``.
    """
    n, c, k = _as_int(n, "n"), _as_int(c, "c"), _as_int(k, "k")
    if n < 1:
        raise ValueError(f"pass_at_k: n={n} must be >= 1")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: c={c} correct samples is outside [0, n={n}]")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: k={k} is outside [1, n={n}] (cannot estimate pass@k from fewer than k samples)")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    # C(n-c, k)/C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i); sum of logs avoids under/overflow
    i = np.arange(n - c + 1, n + 1, dtype=np.float64)
    return float(-np.expm1(np.sum(np.log1p(-k / i))))


def _correct_matrix(correct: Any) -> np.ndarray:
    arr = np.asarray(correct)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"correct must be a non-empty 2-D [problems, samples] array, got shape {arr.shape}")
    if arr.dtype != bool:
        if not np.isin(arr, (0, 1)).all():
            raise ValueError("correct must hold booleans or 0/1 values")
        arr = arr.astype(bool)
    return arr


def pass_at_k_per_problem(correct: Any, k: int) -> np.ndarray:
    """pass@k of each problem, shape [P], from a boolean [P, n] matrix of per-sample correctness."""
    arr = _correct_matrix(correct)
    n = arr.shape[1]
    return np.array([pass_at_k(n, int(c), k) for c in arr.sum(axis=1)], dtype=np.float64)


def pass_at_k_curve(correct: Any, ks: Sequence[int]) -> dict[int, float]:
    """Mean over problems of pass@k for each k in ``ks``; ``correct`` is a boolean [P, n] matrix."""
    arr = _correct_matrix(correct)
    return {int(k): float(pass_at_k_per_problem(arr, k).mean()) for k in ks}


def avg_at_n(correct: Any) -> float:
    """Mean per-sample accuracy over a boolean [P, n] matrix (= pass@1 = avg@n)."""
    return float(_correct_matrix(correct).mean())


# --------------------------------------------------------------------------------------------------
# maj@k
# --------------------------------------------------------------------------------------------------


def _classes(answers: Sequence[Hashable | None], correct: Sequence[Any]) -> tuple[list[int], list[bool], int]:
    """(class sizes, class correctness, number of abstaining samples) of one problem."""
    if len(answers) != len(correct):
        raise ValueError(f"answers ({len(answers)}) and correct ({len(correct)}) differ in length")
    sizes: dict[Hashable, int] = {}
    right: dict[Hashable, bool] = {}
    abstain = 0
    for a, y in zip(answers, correct):
        if a is None:
            abstain += 1
            continue
        y = bool(y)
        if a in right and right[a] != y:
            raise ValueError(
                f"answer class {a!r} has both correct and wrong samples; answer keys must determine correctness"
            )
        right[a] = y
        sizes[a] = sizes.get(a, 0) + 1
    keys = list(sizes)
    return [sizes[a] for a in keys], [right[a] for a in keys], abstain


def _n_count_vectors(sizes: Sequence[int], k: int, cap: int) -> int:
    """Number of vectors (c_j) with 0 <= c_j <= sizes[j], sum == k (stops counting above ``cap``)."""
    ways = [1] + [0] * k  # ways[t]: vectors over the classes seen so far summing to t
    for s in sizes:
        new = [0] * (k + 1)
        for t, w in enumerate(ways):
            if w:
                for c in range(min(s, k - t) + 1):
                    new[t + c] += w
        ways = [min(w, cap + 1) for w in new]
    return ways[k]


def _maj_exact(sizes: list[int], right: list[bool], abstain: int, k: int, n: int) -> float:
    """Sum over per-class count vectors (c_j, c_abstain), weight prod C(s_j, c_j) * C(abstain, c_a) / C(n, k)."""
    m = len(sizes)
    total = 0
    # suffix capacities let the recursion skip branches that cannot reach k
    cap_after = [0] * (m + 1)
    for j in range(m - 1, -1, -1):
        cap_after[j] = cap_after[j + 1] + sizes[j]
    counts = [0] * m
    num = 0.0  # sum of weight * vote value, weight as exact int, value as float

    def rec(j: int, left: int, weight: int) -> None:
        nonlocal total, num
        if j == m:
            if left > abstain:
                return
            w = weight * math.comb(abstain, left)
            top = max(counts) if m else 0
            if top > 0:
                winners = [right[i] for i in range(m) if counts[i] == top]
                num += w * (sum(winners) / len(winners))
            total += w
            return
        lo = max(0, left - cap_after[j + 1] - abstain)
        for c in range(lo, min(sizes[j], left) + 1):
            counts[j] = c
            rec(j + 1, left - c, weight * math.comb(sizes[j], c))
        counts[j] = 0

    rec(0, k, 1)
    assert total == math.comb(n, k), (total, math.comb(n, k))  # the weights enumerate every k-subset once
    return num / total


def _maj_mc(sizes: list[int], right: list[bool], abstain: int, k: int, n_draws: int, seed: Any) -> float:
    """Monte Carlo estimate of the same expectation from ``n_draws`` uniformly random k-subsets."""
    m = len(sizes)
    labels = np.repeat(np.arange(m + 1), sizes + [abstain])  # class id per sample; m = abstain
    n = labels.size
    rng = np.random.default_rng(seed)
    value = 0.0
    right_arr = np.asarray(right + [False], dtype=np.float64)
    for start in range(0, n_draws, 4096):  # chunks bound memory at 4096 x n floats
        b = min(4096, n_draws - start)
        # a uniformly random k-subset per row: the k smallest of n iid uniforms
        idx = np.argpartition(rng.random((b, n)), k - 1, axis=1)[:, :k]
        lab = labels[idx]  # [b, k]
        flat = (np.arange(b)[:, None] * (m + 1) + lab).ravel()
        counts = np.bincount(flat, minlength=b * (m + 1)).reshape(b, m + 1)[:, :m]  # abstentions do not vote
        if m == 0:
            continue
        top = counts.max(axis=1, keepdims=True)
        win = (counts == top) & (top > 0)  # [b, m]
        n_win = win.sum(axis=1)
        good = (win * right_arr[:m]).sum(axis=1)
        value += float(np.sum(np.where(n_win > 0, good / np.maximum(n_win, 1), 0.0)))
    return value / n_draws


def maj_at_k(
    answers: Sequence[Hashable | None],
    correct: Sequence[Any],
    k: int,
    *,
    exact_limit: int = 20_000,
    n_draws: int = 20_000,
    seed: int | Sequence[int] = 0,
) -> float:
    """maj@k of one problem from its n samples.

    Definition: draw a uniformly random k-subset S of the n samples. Samples vote with their answer key
    (``answers[i]``, e.g. the normalised extracted answer; ``None`` = no answer, which does not vote). The
    winners are the keys with the most votes in S. The value of S is the fraction of winners whose class is
    correct, i.e. the expected correctness when a tie is broken uniformly at random; S with no votes at
    all scores 0. ``maj@k`` is the expectation of that value over all C(n, k) subsets. A class is correct
    when its samples are correct (``correct[i]``); samples sharing a key must agree (ValueError otherwise,
    since the key should determine correctness). ``maj@n`` is plain majority voting over all samples;
    ``maj@1`` equals avg@n.

    Computation: exact when the number of per-class count vectors (c_1, ..., c_m, c_none) summing to k is
    at most ``exact_limit``; each vector is weighted by ``prod C(size_j, c_j)`` subsets (so the sum covers
    all C(n, k) subsets exactly; this is always the case when C(n, k) <= exact_limit). Otherwise a seeded
    Monte Carlo average over ``n_draws`` random k-subsets drawn with ``numpy.random.default_rng(seed)``
    (standard error <= 0.5 / sqrt(n_draws), 0.0035 at the default 20,000).
    """
    n = len(answers)
    k = _as_int(k, "k")
    if n == 0:
        raise ValueError("maj_at_k: no samples")
    if not 1 <= k <= n:
        raise ValueError(f"maj_at_k: k={k} is outside [1, n={n}]")
    if n_draws < 1 or exact_limit < 0:
        raise ValueError(f"maj_at_k: n_draws={n_draws} must be >= 1 and exact_limit={exact_limit} >= 0")
    sizes, right, abstain = _classes(answers, correct)
    if not any(right):
        return 0.0
    if _n_count_vectors(sizes + [abstain], k, exact_limit) <= exact_limit:
        return _maj_exact(sizes, right, abstain, k, n)
    return _maj_mc(sizes, right, abstain, k, n_draws, seed)


def maj_at_k_curve(
    answers: Sequence[Sequence[Hashable | None]],
    correct: Sequence[Sequence[Any]],
    ks: Sequence[int],
    *,
    exact_limit: int = 20_000,
    n_draws: int = 20_000,
    seed: int = 0,
) -> dict[int, float]:
    """Mean over problems of :func:`maj_at_k` for each k; problem ``p`` uses seed ``(seed, p)`` for MC."""
    if len(answers) != len(correct) or not answers:
        raise ValueError(
            f"need the same non-zero number of problems, got {len(answers)} answers, {len(correct)} correct"
        )
    out = {}
    for k in ks:
        vals = [
            maj_at_k(a, c, k, exact_limit=exact_limit, n_draws=n_draws, seed=(seed, p))
            for p, (a, c) in enumerate(zip(answers, correct))
        ]
        out[int(k)] = float(np.mean(vals))
    return out


# --------------------------------------------------------------------------------------------------
# bootstrap
# --------------------------------------------------------------------------------------------------


