"""Every token loss of the project: EKSFT, its paper ablations, the baselines and the authors'-code variant.

Notation (per valid token t of the batch; rows are shifted, label -100 rows are ignored everywhere):
    CE(t) = -log pi_theta(y_t),  H(t) = full-vocab entropy of pi_theta,  KL(t) = KL(pi_theta || pi_ref),
    N = number of valid tokens in the global batch (the plan's ``n_tokens``).
All means use global denominators from the plan so micro-batch parts add up to the batch loss.
Empty sets contribute 0 (a zero sum over an empty set, never 0/0).

The classes live in one module per family, each listing its losses in ``LOSSES``; this module collects them into
the registry's list (``LOSS_CLASSES``) and re-exports every class, so ``eksft_pipeline.losses.variants.<Class>``
works:
    selective.py      EKSFT, EKSFTOfficial (+ RHO, LAMBDA_H, LAMBDA_KL, selection_metrics and the base _SelectiveLoss)
    ablations.py      EKSFTNoEntropyReg, EKSFTNoKLReg, EKSFTNoReg, EntropyMaskOnly, KLMaskOnly, RandomMask, GlobalReg
    reweighting.py    SFT, IWSFT, DFT
    trust_region.py   PSFT, ASFT
"""

from __future__ import annotations

from . import ablations, reweighting, selective, trust_region
from .base import TokenLoss
from .selective import LAMBDA_H, LAMBDA_KL, RHO, selection_metrics

# every family's LOSSES (a new loss in a family module is registered there, with no edit here)
LOSS_CLASSES: tuple[type[TokenLoss], ...] = (
    *selective.LOSSES, *ablations.LOSSES, *reweighting.LOSSES, *trust_region.LOSSES
)

__all__ = [c.__name__ for c in LOSS_CLASSES] + ["LAMBDA_H", "LAMBDA_KL", "LOSS_CLASSES", "RHO", "selection_metrics"]
