"""The paper's ablations of EKSFT: without one or both regularisers, selection by one criterion, a random
mask (App. H), and the regularisers on every token (``global_reg``). Notation (CE, H, KL, N, global
denominators, empty sets) as in variants.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import (
    LinearTokenLoss,
    Param,
    Plan,
    TokenLoss,
    base_metrics,
    denom,
    nonneg,
    require_stats,
    unit_interval,
)
from .selection import ceil_k, random_mask, topk_mask
from .selective import EKSFT, LAMBDA_H, LAMBDA_KL, RHO, _SelectiveLoss, selection_metrics
from .stats import TokenStats


class EKSFTNoEntropyReg(EKSFT):
    """Ablation: EKSFT with lambda_H = 0 —
    loss = mean_{t∉M} CE(t) + lambda_KL · mean_{t∈M} KL(t), M = M_H ∪ M_KL as in ``eksft``.
    Source: EKSFT paper, ablations."""

    name = "eksft_no_entropy_reg"
    PARAMS = {"rho": RHO, "lambda_kl": LAMBDA_KL}
    FIXED = {"lambda_entropy": 0.0}


class EKSFTNoKLReg(EKSFT):
    """Ablation: EKSFT with lambda_KL = 0 —
    loss = mean_{t∉M} CE(t) − lambda_H · mean_{t∈M} H(t), M = M_H ∪ M_KL (KL still drives the selection).
    Source: EKSFT paper, ablations."""

    name = "eksft_no_kl_reg"
    PARAMS = {"rho": RHO, "lambda_entropy": LAMBDA_H}
    FIXED = {"lambda_kl": 0.0}


class EKSFTNoReg(EKSFT):
    """Ablation (paper Table 3, "w/o both regularisers"): masking only, lambda_H = lambda_KL = 0 —
    loss = mean_{t∉M} CE(t), M = M_H ∪ M_KL as in ``eksft`` (H and KL still drive the selection, so the
    reference model is still needed). Source: EKSFT paper, Table 3."""

    name = "eksft_no_reg"
    PARAMS = {"rho": RHO}
    FIXED = {"lambda_entropy": 0.0, "lambda_kl": 0.0}


class EntropyMaskOnly(_SelectiveLoss):
    """Ablation: select by entropy only, M = M_H (top ceil(rho·N) by H); regularisers as EKSFT:
    loss = mean_{t∉M_H} CE − lambda_H · mean_{t∈M_H} H + lambda_KL · mean_{t∈M_H} KL.
    Source: EKSFT paper, ablations."""

    name = "entropy_mask_only"
    MASK_SETS = 1

    def _mask(self, m_h, m_kl, valid, generator):
        return m_h


class KLMaskOnly(_SelectiveLoss):
    """Ablation: select by KL only, M = M_KL (top ceil(rho·N) by KL); regularisers as EKSFT:
    loss = mean_{t∉M_KL} CE − lambda_H · mean_{t∈M_KL} H + lambda_KL · mean_{t∈M_KL} KL.
    Source: EKSFT paper, ablations."""

    name = "kl_mask_only"
    MASK_SETS = 1

    def _mask(self, m_h, m_kl, valid, generator):
        return m_kl


class RandomMask(_SelectiveLoss):
    """Ablation (paper App. H): drop a uniformly random ``mask_ratio`` share of the tokens from the CE.

    Over the N valid tokens of the batch: M = ceil(mask_ratio·N) valid tokens drawn uniformly without
    replacement (default mask_ratio = 0.1, the paper's 10%);

        loss = mean_{t∉M} CE(t) − lambda_H · mean_{t∈M} H(t) + lambda_KL · mean_{t∈M} KL(t).

    Defaults lambda_H = lambda_KL = 0.05, EKSFT's: App. H "uniformly drops 10% of tokens from CE supervision
    and applies the same entropy/KL regularization on the dropped tokens", so the random set M gets EKSFT's
    entropy bonus and KL anchor with EKSFT's weights, and the reference model is loaded (``needs_ref``); no
    pre-pass is needed (the mask depends on no statistic). lambda_entropy = lambda_kl = 0 gives the plain
    drop (masking only; no reference then).

    ``match_eksft_size=True`` (ours, the project's earlier variant): |M| = |M_H ∪ M_KL| of ``eksft`` at ``rho``
    on this batch instead of mask_ratio·N (between ceil(rho·N) and 2·ceil(rho·N), about 40% of the tokens at
    rho = 0.2 early in training); the metrics n_mask_h, n_mask_kl and iou then describe that EKSFT selection.

    Randomness: ``plan(..., generator=g)`` if given, else the loss's own ``torch.Generator`` seeded with ``seed``
    at construction (advancing with every plan, so successive batches get different masks and two instances
    with the same seed give the same sequence -- which is how data-parallel ranks agree when each builds the
    global plan). Source: EKSFT paper, Appendix H (random masking).
    """

    name = "random_mask"
    PARAMS = {
        "mask_ratio": unit_interval("fraction of valid tokens dropped uniformly at random (|M| = ceil(ratio·N))", 0.1),
        "lambda_entropy": nonneg("weight of the entropy bonus on the random set (App. H: EKSFT's)", LAMBDA_H.default),
        "lambda_kl": nonneg("weight of the KL(pi_theta || pi_ref) penalty on the random set (App. H: EKSFT's)",
                            LAMBDA_KL.default),
        "match_eksft_size": Param(False, bool, None, "", "|M| = |M_H ∪ M_KL| of eksft at rho instead of mask_ratio·N"),
        "rho": RHO,
        "seed": Param(0, int, lambda v: v >= 0, ">= 0", "seed of the loss's own generator"),
    }

    def __init__(self, **params):
        super().__init__(**params)
        self._generator = torch.Generator().manual_seed(self.params["seed"])

    @property
    def needs_ref(self) -> bool:  # type: ignore[override]
        return bool(self.params["match_eksft_size"] or self.params["lambda_kl"])

    @property
    def needs_prepass(self) -> bool:  # type: ignore[override]
        return bool(self.params["match_eksft_size"])

    @property
    def selected_fraction(self) -> float:
        """|M| = ceil(mask_ratio·N), or <= 2·ceil(rho·N) with match_eksft_size; 0 when both lambdas are 0."""
        if not (self.params["lambda_entropy"] or self.params["lambda_kl"]):
            return 0.0
        return min(1.0, 2 * self.params["rho"]) if self.params["match_eksft_size"] else self.params["mask_ratio"]

    def plan(self, stats: TokenStats, seq_ids: Tensor | None = None, generator: torch.Generator | None = None) -> Plan:
        valid, n = stats.valid, stats.n_tokens
        k = m_h = m_kl = None
        if self.params["match_eksft_size"]:
            require_stats(self, stats, "entropy", "logp", "kl")
            k = ceil_k(self.params["rho"], n)
            m_h, m_kl = topk_mask(stats.entropy, valid, k), topk_mask(stats.kl, valid, k)
            size = int((m_h | m_kl).sum())
        else:
            size = ceil_k(self.params["mask_ratio"], n)
        mask = random_mask(valid, size, generator if generator is not None else self._generator)
        n_mask = int(mask.sum())
        metrics = base_metrics(stats) | selection_metrics(stats, mask, k=k, m_h=m_h, m_kl=m_kl)
        return Plan(
            token={"mask": mask},
            scalars={"n_tokens": float(n), "n_unmasked": float(n - n_mask), "n_mask": float(n_mask)},
            metrics=metrics,
        )


class GlobalReg(LinearTokenLoss):
    """Ablation: no selection, the regularisers on every token —
    loss = mean_t CE(t) − lambda_H · mean_t H(t) + lambda_KL · mean_t KL(t) over all N valid tokens.
    Source: EKSFT paper, ablations."""

    name = "global_reg"
    PARAMS = {"lambda_entropy": LAMBDA_H, "lambda_kl": LAMBDA_KL}
    needs_ref = True

    @property
    def ref_in_compute(self) -> bool:
        return self.params["lambda_kl"] != 0

    @property
    def selected_fraction(self) -> float:
        """Every row carries the H / KL terms (none when both lambdas are 0)."""
        return 1.0 if (self.params["lambda_entropy"] or self.params["lambda_kl"]) else 0.0

    def coefficients(self, token, scalars, valid):
        w = valid.float() / denom(scalars["n_tokens"])
        lam_h, lam_kl = self.params["lambda_entropy"], self.params["lambda_kl"]
        return w, (w * -lam_h if lam_h else None), (w * lam_kl if lam_kl else None)


# this family's registered losses (variants.LOSS_CLASSES collects every family's)
LOSSES: tuple[type[TokenLoss], ...] = (
    EKSFTNoEntropyReg, EKSFTNoKLReg, EKSFTNoReg, EntropyMaskOnly, KLMaskOnly, RandomMask, GlobalReg,
)


__all__ = [
    "LOSSES", "EKSFTNoEntropyReg", "EKSFTNoKLReg", "EKSFTNoReg", "EntropyMaskOnly", "GlobalReg", "KLMaskOnly",
    "RandomMask",
]  # fmt: skip
