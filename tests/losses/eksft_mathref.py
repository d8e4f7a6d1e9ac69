"""Independent pure-python (math module, lists of floats) reference formulas for the loss tests.

Nothing here imports the library: these are the paper / baseline formulas written out by hand, used to
check the library's numbers on tiny cases.
"""

from __future__ import annotations

import math


def softmax(row: list[float]) -> list[float]:
    m = max(row)
    e = [math.exp(x - m) for x in row]
    s = sum(e)
    return [x / s for x in e]


def log_softmax(row: list[float]) -> list[float]:
    m = max(row)
    lse = m + math.log(sum(math.exp(x - m) for x in row))
    return [x - lse for x in row]


def entropy(row: list[float]) -> float:
    return -sum(p * lp for p, lp in zip(softmax(row), log_softmax(row)))


def kl(row: list[float], ref: list[float]) -> float:
    """KL(softmax(row) || softmax(ref))."""
    return sum(p * (lp - lq) for p, lp, lq in zip(softmax(row), log_softmax(row), log_softmax(ref)))


def ce(row: list[float], y: int) -> float:
    return -log_softmax(row)[y]


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def topk_stable(scores: list[float], k: int) -> set[int]:
    """Indices of the k largest scores; ties -> lower index first."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return set(order[:k])


def selective_loss(logits, ref, labels, mask: set[int], lam_h: float, lam_kl: float) -> float:
    """mean_{t∉M} CE − lam_h · mean_{t∈M} H + lam_kl · mean_{t∈M} KL."""
    n = len(labels)
    unmasked = [t for t in range(n) if t not in mask]
    return (mean([ce(logits[t], labels[t]) for t in unmasked])
            - lam_h * mean([entropy(logits[t]) for t in sorted(mask)])
            + lam_kl * mean([kl(logits[t], ref[t]) for t in sorted(mask)]))
