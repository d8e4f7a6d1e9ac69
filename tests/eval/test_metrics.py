"""pass@k / avg@n / maj@k / bootstrap CIs against brute-force enumeration and hand-computed values."""

from __future__ import annotations

import itertools
import math
import time
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest

from eksft_pipeline.eval.metrics import (
    avg_at_n,
    bootstrap_ci,
    maj_at_k,
    maj_at_k_curve,
    pass_at_k,
    pass_at_k_curve,
    pass_at_k_per_problem,
)

# ---------------------------------------------------------------------------------------------- pass@k


def brute_pass_at_k(flags: list[bool], k: int) -> Fraction:
    subsets = list(itertools.combinations(range(len(flags)), k))
    return Fraction(sum(any(flags[i] for i in s) for s in subsets), len(subsets))


@pytest.mark.parametrize("n", range(1, 11))
def test_pass_at_k_matches_enumeration_of_all_k_subsets(n):
    for c in range(n + 1):
        flags = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(float(brute_pass_at_k(flags, k)), abs=1e-12), (n, c, k)


def test_pass_at_k_edge_cases():
    assert pass_at_k(7, 0, 3) == 0.0
    assert pass_at_k(7, 7, 3) == 1.0
    assert pass_at_k(7, 1, 7) == 1.0  # k = n: any correct sample is in the only subset
    assert pass_at_k(7, 0, 7) == 0.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 = c/n
    assert pass_at_k(4, 2, 3) == 1.0  # n - c < k


@pytest.mark.parametrize("n,c,k", [(3000, 10, 500), (5000, 1, 4999), (4096, 300, 64), (2000, 1999, 1)])
def test_pass_at_k_is_accurate_for_large_n(n, c, k):
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-10, abs=1e-14)


@pytest.mark.parametrize(
    "args,exc",
    [
        ((5, 2, 6), ValueError),
        ((5, 6, 2), ValueError),
        ((5, -1, 2), ValueError),
        ((5, 2, 0), ValueError),
        ((0, 0, 1), ValueError),
        ((5.0, 2, 2), TypeError),
        ((5, True, 2), TypeError),
    ],
)
def test_pass_at_k_rejects_bad_input(args, exc):
    with pytest.raises(exc):
        pass_at_k(*args)


def test_pass_at_k_curve_and_avg_at_n():
    rng = np.random.default_rng(3)
    correct = rng.random((6, 8)) < np.linspace(0.05, 0.9, 6)[:, None]
    curve = pass_at_k_curve(correct, [1, 2, 5, 8])
    for k, v in curve.items():
        expected = np.mean([float(brute_pass_at_k(list(row), k)) for row in correct])
        assert v == pytest.approx(expected, abs=1e-12)
    assert avg_at_n(correct) == pytest.approx(correct.mean())
    assert curve[1] == pytest.approx(avg_at_n(correct))
    assert pass_at_k_per_problem(correct.astype(int), 2).shape == (6,)
    with pytest.raises(ValueError, match="k=9"):
        pass_at_k_curve(correct, [9])
    with pytest.raises(ValueError, match="2-D"):
        pass_at_k_curve(correct[0], [1])
    with pytest.raises(ValueError, match="0/1"):
        avg_at_n([[0, 2]])


# ---------------------------------------------------------------------------------------------- maj@k


def brute_maj_at_k(answers, correct, k) -> float:
    """Independent definition: average over all k-subsets; ties broken uniformly at random (fractional)."""
    cls_ok = {a: bool(y) for a, y in zip(answers, correct) if a is not None}
    total = 0.0
    subsets = list(itertools.combinations(range(len(answers)), k))
    for s in subsets:
        votes = Counter(answers[i] for i in s if answers[i] is not None)
        if not votes:
            continue
        top = max(votes.values())
        winners = [a for a, v in votes.items() if v == top]
        total += sum(cls_ok[a] for a in winners) / len(winners)
    return total / len(subsets)


def _random_problem(rng, n):
    keys = ["a", "b", "c", "d", None]
    answers = [keys[i] for i in rng.integers(0, len(keys), n)]
    ok = {"a": True, "b": False, "c": bool(rng.integers(0, 2)), "d": False}
    return answers, [a is not None and ok[a] for a in answers]


def test_maj_at_k_exact_path_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(40):
        n = int(rng.integers(1, 10))
        answers, correct = _random_problem(rng, n)
        for k in range(1, n + 1):
            assert maj_at_k(answers, correct, k) == pytest.approx(brute_maj_at_k(answers, correct, k), abs=1e-12)


def test_maj_at_k_exact_on_larger_subset_space_matches_brute_force():
    rng = np.random.default_rng(1)
    answers, correct = _random_problem(rng, 16)  # C(16, 8) = 12870 subsets
    assert maj_at_k(answers, correct, 8) == pytest.approx(brute_maj_at_k(answers, correct, 8), abs=1e-12)


def test_maj_at_k_hand_computed_ties():
    # one correct and one wrong vote: a tie at k=2 is worth 1/2
    assert maj_at_k(["x", "y"], [True, False], 2) == 0.5
    # k=1: the drawn sample's correctness; abstentions (None) count as wrong
    assert maj_at_k(["x", "y", None, "x"], [1, 0, 0, 1], 1) == pytest.approx(0.5)
    # x, x, y with k=2: subsets {x,x} -> 1, {x,y} x2 -> tie 1/2 each => (1 + 0.5 + 0.5) / 3
    assert maj_at_k(["x", "x", "y"], [1, 1, 0], 2) == pytest.approx(2 / 3)
    # all samples abstain
    assert maj_at_k([None, None], [0, 0], 1) == 0.0


def test_maj_at_k_monte_carlo_path():
    rng = np.random.default_rng(2)
    answers, correct = _random_problem(rng, 12)
    exact = brute_maj_at_k(answers, correct, 6)
    mc = maj_at_k(answers, correct, 6, exact_limit=0, n_draws=40_000, seed=5)
    assert abs(mc - exact) < 4 * 0.5 / math.sqrt(40_000)
    assert mc == maj_at_k(answers, correct, 6, exact_limit=0, n_draws=40_000, seed=5)  # seeded
    assert mc != maj_at_k(answers, correct, 6, exact_limit=0, n_draws=40_000, seed=6)


def test_maj_at_k_large_n_agrees_with_an_independent_simulation():
    rng = np.random.default_rng(4)
    keys = rng.choice(["0", "1", "2"], size=256, p=[0.4, 0.35, 0.25]).tolist()
    # ~75 singleton "junk" classes besides three big ones: too many count vectors -> Monte Carlo path
    answers = [a if rng.random() > 0.3 else f"junk{i}" for i, a in enumerate(keys)]
    correct = [a == "0" for a in answers]
    t = time.perf_counter()
    v = maj_at_k(answers, correct, 16)
    assert time.perf_counter() - t < 10
    sim = []
    for _ in range(4000):
        s = rng.choice(256, 16, replace=False)
        votes = Counter(answers[i] for i in s)
        top = max(votes.values())
        winners = [a for a, c in votes.items() if c == top]
        sim.append(sum(a == "0" for a in winners) / len(winners))
    assert v == pytest.approx(np.mean(sim), abs=0.03)  # both SEs <= 0.008


def test_maj_at_k_rejects_bad_input():
    with pytest.raises(ValueError, match="both correct and wrong"):
        maj_at_k(["x", "x"], [True, False], 1)
    with pytest.raises(ValueError, match="k=3"):
        maj_at_k(["x", "y"], [1, 0], 3)
    with pytest.raises(ValueError, match="differ in length"):
        maj_at_k(["x", "y"], [1], 1)


def test_maj_at_k_curve_averages_problems():
    rng = np.random.default_rng(7)
    probs = [_random_problem(rng, 6) for _ in range(5)]
    curve = maj_at_k_curve([p[0] for p in probs], [p[1] for p in probs], [1, 3, 6])
    for k, v in curve.items():
        assert v == pytest.approx(np.mean([brute_maj_at_k(a, c, k) for a, c in probs]), abs=1e-12)


# ---------------------------------------------------------------------------------------------- bootstrap


def test_bootstrap_is_reproducible_and_contains_the_point():
    vals = np.random.default_rng(0).random(50)
    a = bootstrap_ci(vals, seed=3)
    assert a == bootstrap_ci(vals, seed=3)
    assert a != bootstrap_ci(vals, seed=4)
    point, low, high = a
    assert point == pytest.approx(vals.mean())
    assert low < point < high


def test_bootstrap_vectorised_mean_equals_generic_stat_path():
    vals = np.random.default_rng(1).random(40)
    fast = bootstrap_ci(vals, seed=9)
    slow = bootstrap_ci(vals, stat=lambda x: float(np.mean(x)), seed=9)
    assert fast == pytest.approx(slow, abs=1e-12)
    # 2-D input: problems on axis 0, the stat sees whole rows (here: mean accuracy of a [P, n] matrix)
    mat = (np.random.default_rng(1).random((40, 4)) < 0.5).astype(float)
    two_d = bootstrap_ci(mat, stat=lambda x: float(x.mean()), seed=9)
    one_d = bootstrap_ci(mat.mean(axis=1), seed=9)
    assert two_d == pytest.approx(one_d, abs=1e-12)


def test_bootstrap_interval_shrinks_with_more_problems():
    rng = np.random.default_rng(2)
    small = rng.random(100) < 0.3
    large = rng.random(1600) < 0.3
    _, lo_s, hi_s = bootstrap_ci(small.astype(float))
    _, lo_l, hi_l = bootstrap_ci(large.astype(float))
    # the width scales like 1/sqrt(P): 16x the problems -> about 1/4 of the width
    assert (hi_l - lo_l) < 0.4 * (hi_s - lo_s)


def test_bootstrap_coverage_is_near_nominal():
    rng = np.random.default_rng(11)
    hits = 0
    reps = 200
    for r in range(reps):
        vals = (rng.random(100) < 0.3).astype(float)
        _, low, high = bootstrap_ci(vals, n_boot=1000, seed=r)
        hits += low <= 0.3 <= high
    assert 0.88 <= hits / reps <= 0.99


@pytest.mark.parametrize(
    "vals,kw,match",
    [
        ([], {}, "at least one"),
        ([1.0, np.nan], {}, "NaN"),
        ([1.0], {"alpha": 1.5}, "alpha"),
        ([1.0], {"n_boot": 0}, "n_boot"),
    ],
)
def test_bootstrap_rejects_bad_input(vals, kw, match):
    with pytest.raises(ValueError, match=match):
        bootstrap_ci(vals, **kw)
