"""Token selection for EKSFT: top-k masks by entropy / KL, their union, and diagnostics.

Paper semantics: over the N valid tokens of the (global) batch, k = ceil(rho * N),
M_H = top-k tokens by entropy, M_KL = top-k tokens by KL(pi_theta || pi_ref), M = M_H ∪ M_KL.

Ties and zero scores (the paper does not specify them; this is the project's rule, the same for every
selective loss, tested in tests/losses/test_registry_and_selection.py):

1. A token whose score is not strictly positive is never selected (``select_nonpositive=False``, the default).
   KL(pi_theta || pi_ref)(t) = 0 means the policy equals the reference at t: there is nothing to anchor, and a
   KL penalty there has zero gradient. At the first step pi_theta == pi_ref: every KL is 0 by definition, so
   "top-k by KL" would otherwise be k arbitrary tokens whose cross-entropy is dropped -- with a stable sort,
   the first k rows of the batch, i.e. whole leading sequences. Under this rule M_KL is empty at step 1
   (M = M_H) and holds fewer than k tokens whenever fewer than k tokens have KL > 0. (H(t) = 0 only for a
   one-hot prediction, which has no entropy to protect.)
   Step 1 in any precision: in fp32, KL is exactly 0 there (stats.py uses the exact form sum p (log p - log q)).
   In bf16 the policy (fp32 master weights, bf16 compute) and the reference (bf16) round differently and the
   computed KL is small but positive (rounding noise, ~1e-3 nats per token), so the SFT trainer applies the
   definition itself: at a step where the policy IS the reference (no optimizer update since the initial
   weights, reference = the initial model) it sets KL = 0 before selecting (``TokenStats.policy_is_reference``)
   and logs the KL it measured as ``kl_all_measured`` -- the precision's noise floor, against which later
   steps' ``kl_mask`` can be read. M_KL is therefore empty at step 1 in fp32 and bf16 alike; from step 2 on
   the KL is used as computed (noise included: no tolerance is subtracted). ``eksft_official`` keeps its
   authors' rule (exactly k tokens, zero scores included) and so picks M_KL by tie-breaking at step 1.
2. Among tokens tied at the k-th largest score, the ones kept are drawn uniformly at random -- a permutation
   from ``generator`` (the trainer seeds it per step, identically on every data-parallel rank, so all ranks
   build the same mask; without one a generator seeded with 0 is used) -- never by position. Tokens scoring
   strictly above the k-th largest are always selected; without a tie at the boundary no random number is drawn.

``eksft_official`` keeps exactly k tokens per call, as the authors' ``torch.topk`` does
(``select_nonpositive=True``, ties at random).

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


def topk_mask(
    scores: Tensor,
    valid: Tensor,
    k: int,
    *,
    generator: torch.Generator | None = None,
    select_nonpositive: bool = False,
) -> Tensor:
    """Bool [N] mask of (at most) the k valid rows with the largest scores -- the tie rule of the module docstring.

    Rows with a score <= 0 are never selected unless ``select_nonpositive``; ties at the k-th largest score are
    broken by a random permutation drawn from ``generator`` (seeded with 0 if None), never by row position.
    """
    mask = torch.zeros_like(valid, dtype=torch.bool)
    if k <= 0:
        return mask
    idx = valid.nonzero().squeeze(1)
    if k > idx.numel():
        raise ValueError(f"topk_mask: k={k} exceeds the number of valid tokens {idx.numel()}")
    s = scores.index_select(0, idx)
    if not select_nonpositive:
        keep = s > 0
        idx, s = idx[keep], s[keep]
        k = min(k, idx.numel())
        if k == 0:
            return mask
    vals, order = torch.sort(s, descending=True, stable=True)
    kth = vals[k - 1]
    above = order[vals > kth]  # always selected
    tied = order[vals == kth]  # candidates for the remaining places
    need = k - above.numel()
    if need < tied.numel():
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        perm = torch.randperm(tied.numel(), generator=gen, device=gen.device).to(tied.device)
        tied = tied[perm[:need]]
    mask[idx[above]] = True
    mask[idx[tied]] = True
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


def iou_per_sequence(a: Tensor, b: Tensor, seq_ids: Tensor) -> tuple[float, int]:
    """Mean over sequences of |a ∩ b| / |a ∪ b| restricted to each sequence, and the number of sequences averaged.

    The authors log IoU(M_H, M_KL) per call, i.e. per sequence, and average; sequences where both masks are
    empty (the IoU is undefined) are left out of the mean (their code divides by zero there). Returns (0.0, 0)
    when no sequence has a selected token.
    """
    if a.numel() == 0:
        return 0.0, 0
    _, inv = torch.unique(seq_ids, return_inverse=True)
    n = int(inv.max()) + 1
    inter = torch.zeros(n, dtype=torch.float64).index_add_(0, inv.cpu(), (a & b).cpu().double())
    union = torch.zeros(n, dtype=torch.float64).index_add_(0, inv.cpu(), (a | b).cpu().double())
    has = union > 0
    count = int(has.sum())
    return (float((inter[has] / union[has]).mean()) if count else 0.0), count


def masked_mean(values: Tensor | None, mask: Tensor) -> float:
    """Mean of ``values`` over ``mask`` as a python float (fp32 sum), 0.0 on an empty mask or missing values."""
    if values is None:
        return 0.0
    n = int(mask.sum())
    return float(values.float()[mask].sum() / n) if n else 0.0


__all__ = ["ceil_k", "floor_k_official", "iou", "iou_per_sequence", "masked_mean", "random_mask", "topk_mask"]
