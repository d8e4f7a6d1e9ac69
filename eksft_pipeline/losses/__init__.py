"""Token losses for selective SFT: EKSFT (paper semantics by default), its ablations, the baselines
(sft, dft, iw_sft, psft, asft), the authors'-code variant (eksft_official) and a fused memory-efficient head.

Pure PyTorch (no verl / trainer imports). Rows are shifted (row i of logits predicts labels[i]); label -100
marks ignored rows. Modules:
    stats.py      per-token entropy / KL / log-probs in row chunks (pre-pass), DP all-gather
    selection.py  top-k masks (ceil(rho·N); zero scores never selected, random ties), union, IoU
    base.py       Plan, TokenLoss two-phase interface (stats -> plan once -> compute per micro-batch)
    selective.py, ablations.py, reweighting.py, trust_region.py
                  the loss classes by family, each with its formula and source in the docstring
    variants.py   the notation, and every family's losses collected (LOSS_CLASSES; re-exports every class)
    registry.py   get_loss / available_losses / compute_loss / eksft_loss
    fused.py      fused_eksft_head and friends: no [N, V] tensor (chunked, custom autograd.Function)
Benchmark: ``python scripts/bench_loss.py``.
"""

from .base import LinearTokenLoss, Param, Plan, TokenLoss
from .fused import (
    DEFAULT_CHUNK,
    fused_compute,
    fused_eksft_head,
    fused_linear_loss,
    fused_stats,
    fused_token_loss,
)
from .registry import REGISTRY, available_losses, compute_loss, eksft_loss, get_loss
from .selection import ceil_k, floor_k_official, iou, iou_per_sequence, topk_mask
from .stats import IGNORE_INDEX, TokenStats, all_gather_stats, token_stats

__all__ = [
    "DEFAULT_CHUNK",
    "IGNORE_INDEX",
    "REGISTRY",
    "LinearTokenLoss",
    "Param",
    "Plan",
    "TokenLoss",
    "TokenStats",
    "all_gather_stats",
    "available_losses",
    "ceil_k",
    "compute_loss",
    "eksft_loss",
    "floor_k_official",
    "fused_compute",
    "fused_eksft_head",
    "fused_linear_loss",
    "fused_stats",
    "fused_token_loss",
    "get_loss",
    "iou",
    "iou_per_sequence",
    "token_stats",
    "topk_mask",
]
