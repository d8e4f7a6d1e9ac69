"""Token selection for EKSFT: top-k masks by entropy / KL, their union, and diagnostics.

Paper semantics: over the N valid tokens of the (global) batch, k = ceil(rho * N),
M_H = top-k tokens by entropy, M_KL = top-k tokens by KL(pi_theta || pi_ref), M = M_H ∪ M_KL.

Tie-breaking (deterministic, documented): tokens are ordered by score descending with a *stable* sort,
so among equal scores the token with the lower row index is selected first. The same inputs therefore
give the same mask on every data-parallel rank and on every run (torch.topk makes no such promise).
Consequence worth knowing: at the very first step pi_theta == pi_ref, every KL is exactly 0 (stats.py uses
the exact form Σ p (log p − log q)), so M_KL is the first k valid tokens of the batch in row order; it
becomes informative once the policy has moved. The paper does not specify this case.

``k`` uses ``ceil(round(rho * N, 9))``: the rounding keeps float representation error from adding a
token (0.1 * 30 = 3.0000000000000004 would otherwise give k = 4). The ``eksft_official`` variant instead
reproduces the authors' ``int(N * rho)`` literally.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def ceil_k(rho: float, n: int) -> int:
    """Paper's k = ceil(rho * n), robust to float representation error; 0 <= k <= n."""
    return min(n, max(0, math.ceil(round(rho * n, 9))))


def floor_k_official(rho: float, n: int) -> int:
    """The authors' code: ``k = max(0, int(total_valid_tokens * top_k_ratio))`` (floor, float as is)."""
    return min(n, max(0, int(n * rho)))


def topk_mask(scores: Tensor, valid: Tensor, k: int) -> Tensor:
    """Bool [N] mask of the k valid rows with the largest scores (stable by row index on ties)."""
    mask = torch.zeros_like(valid, dtype=torch.bool)
    if k <= 0:
        return mask
    idx = valid.nonzero().squeeze(1)
    if k > idx.numel():
        raise ValueError(f"topk_mask: k={k} exceeds the number of valid tokens {idx.numel()}")
    order = torch.sort(scores.index_select(0, idx), descending=True, stable=True).indices
    mask[idx[order[:k]]] = True
    return mask


def random_mask(valid: Tensor, m: int, generator: torch.Generator | None) -> Tensor:
    """Bool [N] mask of m valid rows drawn uniformly without replacement (randperm on ``generator``'s device)."""
    mask = torch.zeros_like(valid, dtype=torch.bool)
    idx = valid.nonzero().squeeze(1)
    if m > idx.numel():
        raise ValueError(f"random_mask: m={m} exceeds the number of valid tokens {idx.numel()}")
    if m <= 0:
        return mask
    gen_device = generator.device if generator is not None else torch.device("cpu")
    perm = torch.randperm(idx.numel(), generator=generator, device=gen_device).to(valid.device)
    mask[idx[perm[:m]]] = True
    return mask


def iou(a: Tensor, b: Tensor) -> float:
    """|a ∩ b| / |a ∪ b| of two bool masks; 0.0 when both are empty."""
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 0.0


def masked_mean(values: Tensor | None, mask: Tensor) -> float:
    """Mean of ``values`` over ``mask`` as a python float (fp32 sum), 0.0 on an empty mask or missing values."""
    if values is None:
        return 0.0
    n = int(mask.sum())
    return float(values.float()[mask].sum() / n) if n else 0.0


__all__ = ["ceil_k", "floor_k_official", "iou", "masked_mean", "random_mask", "topk_mask"]
